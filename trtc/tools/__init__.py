"""Tools that use an engine: throughput and latency (bench.py), perplexity (perplexity.py), the
quantization report (quant_report.py)."""
