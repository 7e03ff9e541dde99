"""Development only: local Tansu and OpenBao processes (`gateway dev up`, tests, benchmarks)
and the scripted demo (`gateway demo`). `gateway run` never imports this package."""
