#!/usr/bin/env python3
"""A tiny HTTPS webhook receiver that verifies Vignetim Webhooks signatures.

For local development only. It uses the official Standard Webhooks library
(`pip install standardwebhooks`) and the Python standard library, nothing else.

    python3 docs/receiver-verify.py whs_...            # the secret from POST /webhooks
    WEBHOOK_SECRET=whs_... python3 docs/receiver-verify.py

Options (or environment variables): --port (RECEIVER_PORT, default 8443),
--cert (RECEIVER_CERT, default cert.pem), --key (RECEIVER_KEY, default key.pem).
It listens on 127.0.0.1 only. Each POST is verified: a good signature is printed
as OK and answered 204, a bad one as FAILED and answered 400.
"""

import argparse
import base64
import json
import os
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def to_whsec(secret: str) -> str:
    """Vignetim shows `whs_` + 64 hex digits; the official libraries take the same
    32 bytes as `whsec_` + base64."""
    secret = secret.strip()
    if secret.startswith("whsec_"):
        return secret
    try:
        if not secret.startswith("whs_") or len(secret) != 4 + 64:
            raise ValueError
        key = bytes.fromhex(secret[4:])
    except ValueError:
        sys.exit("the secret must be whs_ followed by 64 hex digits (or whsec_...)")
    return "whsec_" + base64.b64encode(key).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("secret", nargs="?", default=os.environ.get("WEBHOOK_SECRET"),
                        help="the webhook's whs_ signing secret (or set WEBHOOK_SECRET)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("RECEIVER_PORT", "8443")),
                        help="port on 127.0.0.1 (default 8443)")
    parser.add_argument("--cert", default=os.environ.get("RECEIVER_CERT", "cert.pem"),
                        help="PEM certificate (default cert.pem)")
    parser.add_argument("--key", default=os.environ.get("RECEIVER_KEY", "key.pem"),
                        help="PEM private key (default key.pem)")
    args = parser.parse_args()
    if not args.secret:
        parser.error("pass the signing secret as an argument or in WEBHOOK_SECRET")
    webhook = Webhook(to_whsec(args.secret))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                # Verify the raw bytes exactly as received, before parsing them.
                payload = webhook.verify(body, dict(self.headers.items()))
            except WebhookVerificationError as e:
                print(f"FAILED {self.headers.get('webhook-id')}: {e}", flush=True)
                self.send_response(400)
                self.end_headers()
                return
            except json.JSONDecodeError:
                print(f"FAILED {self.headers.get('webhook-id')}: body is not JSON", flush=True)
                self.send_response(400)
                self.end_headers()
                return
            print(f"OK {payload.get('type')} {payload.get('id')}", flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args) -> None:
            pass  # one line per delivery is printed above

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening on https://127.0.0.1:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
