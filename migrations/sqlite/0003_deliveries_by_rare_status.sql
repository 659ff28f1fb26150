-- Deliveries neither pending nor succeeded (failed, held, cancelled): few, so this index
-- costs the writer almost nothing. With it, the metrics' counts by status come from
-- indexes alone: the total from the smallest index, pending from the due index, these
-- from this one, and succeeded is what is left. The scan of the whole table it replaces
-- took 20 ms at 30,000 deliveries and 365 ms at a million, at every scrape
-- (BENCHMARKS.md, step 27).
CREATE INDEX deliveries_by_rare_status ON deliveries (status)
    WHERE status <> 'pending' AND status <> 'succeeded';
