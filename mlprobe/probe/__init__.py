"""Heads trained on cached features: the sweep, its joint trainer, metrics and result files.

Modules:
- heads: single and stacked heads.
- sweep: head configurations and the grid.
- data: row sources and the train/validation split.
- train: joint training.
- metrics: AP, mAP, CP/CR/CF1, OP/OR/OF1.
- selection: choosing the configuration on validation mAP.
- results: CSV, JSON, markdown, plot and weight files.
- run: the whole probe run over feature stores.
"""
