"""`specd bench`: every strategy against plain decoding and against transformers' own
decoding, on packaged prompt sets, with tables and plots.

prompts.py  where the prompts come from (packaged data sets, a user's JSONL)
runner.py   the runs: through the services, in-process, and the transformers peers
metrics.py  pure aggregation: per-prompt records into per-category figures, the lossless check
report.py   the Markdown tables, results.json and the plots
"""
