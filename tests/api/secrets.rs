//! Signing secrets are sealed at rest: the database file never holds one in clear.

use crate::helpers::*;

#[tokio::test]
async fn the_database_holds_no_secret_in_clear() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let mut secrets = Vec::new();
    for n in 0..3 {
        let created = customer
            .create_webhook(&format!("https://h{n}.example.com/x"))
            .await;
        let shown = created["signingSecret"]
            .as_str()
            .expect("secret")
            .to_owned();
        secrets.push(hex::decode(&shown[4..]).expect("hex"));
        secrets.push(shown.into_bytes());
    }
    let mut files = 0;
    for entry in std::fs::read_dir(&app.data_dir).expect("data dir") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vignetim.db"))
        {
            let bytes = std::fs::read(&path).expect("read");
            files += 1;
            for secret in &secrets {
                // Look for the secret and for its first half (a partial leak is a leak).
                for needle in [&secret[..], &secret[..secret.len() / 2]] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle),
                        "secret material found in {}",
                        path.display()
                    );
                }
            }
        }
    }
    assert!(files >= 1, "no database file found");
}
