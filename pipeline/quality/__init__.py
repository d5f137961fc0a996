"""Index quality: trusted retrieval measures, the reranker as judge, nightly trends, alerts and a report.

ranking.py    trec_eval's ordering of a run (score desc, doc_id desc), written once
metrics.py    judged measures, trec_eval-exact (nDCG@k, RR, R@k, P@k, AP, Success@k, Rprec, Judged@k)
label_free.py the reranker as judge: judge/nDCG@k, Overlap@k, extrapolated RBO, Held<m>@k, score summary
segments.py   per-segment means over any query-level column
compare.py    tonight vs the previous night: deltas, paired randomization test, alerts
history.py    one Parquet row per night plus per-query values, on any fsspec URI
report.py     metrics.json, per_query.parquet, self-contained report.html
  night_report.py  the night's measures, comparisons and run facts (NightReport), metrics.json's content
  statistics.py    bootstrap intervals of the means, per-query change since the previous night
  plots.py         the report's figures as base64 PNGs
  page.py          report.html, section by section
run_input.py  the job's --run (TREC run or the rerank job's Parquet) as one table
nightly.py    one night end to end; jobs/index_quality.py is its command line
"""
