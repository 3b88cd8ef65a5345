"""Long-context evaluation: NIAH in RULER's formats, perplexity vs length, LongBench v1, reports.

    niah.py        RULER's NIAH tasks: generator (token-exact lengths) and string_match_all scorer
    decoding.py    greedy decoding with a KV cache: one prefill, then one step per new token
    perplexity.py  next-token loss at any length (chunked lm_head), and the crop-to-C_train reference
    longbench.py   LongBench v1 records, prompts, middle truncation and metrics
    harness.py     lm-evaluation-harness (lm_eval:<task>) on the loaded model: the paper's in-context set, RULER, LongBench
    report.py      results table (JSON + Markdown), NIAH heatmaps, perplexity-vs-length plot
"""
