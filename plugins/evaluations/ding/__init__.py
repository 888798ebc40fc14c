"""Ding et al.'s statistical tests of similarity measures (paper Section 5, Tables 2 and
3), as two evaluation plugins: ``ding_sensitivity`` (`sensitivity`) and
``ding_specificity`` (`specificity`); see docs/ding.md.

The package: `params`, `representations` (a layer or its low-rank approximation),
`features` (pooled probe features and row moments, one pass per network), `probe_training`
(linear probes, trained as one batched model), `probes` (probe accuracies as jobs, reused
by key), `distances` (every measure through its plugin), `stats` (rank correlations and
their significance), `framework` (the logic both tests share), `figures` and `report`.
The plugin modules import neither torch nor numpy at their top level.
"""
