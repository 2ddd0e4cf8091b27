"""A toy world in which BCR's effects can be observed on a laptop CPU (nothing in the core package imports it).

`world`: arithmetic-chain problems, the toy tokenizer and verbose reference traces; `pipeline`: the replication
(warm start → GRPO / BCR / length-penalty RL runs with the real trainer → the scaling-law evaluation).
"""
