"""kvbench's runner: models, the lm-eval adapter, measurements, records and reports."""
