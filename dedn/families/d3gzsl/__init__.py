"""D3GZSL (Wang et al., AAAI 2024) as a model family: work in progress on branch wip/d3gzsl (issue 13).

Here so far: the networks (`nets`), the losses (`losses`: L_cls, L_kl, L_be, L_od, WGAN-GP) and
one critic step / generator step in the authors' order (`step`), the train-fitted feature
scaler, seeded synthesis and the final softmax classifier (`classifier`), tested on tiny shapes
(tests/test_d3gzsl_losses.py). Not yet a registered family: the family class (config blocks,
train_step counting critic steps, checkpointed optimisers), teacher pretraining, pooled features from
the shards, the evaluation and validation selection around the classifier are still to come, so
`model=d3gzsl` is not offered.
"""
