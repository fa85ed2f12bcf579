"""D3GZSL (Wang et al., AAAI 2024) as a model family: work in progress on branch wip/d3gzsl (issue 13).

Here so far: the networks (`nets`) and the losses (`losses`: L_cls, L_kl, L_be, L_od, WGAN-GP),
tested on tiny shapes (tests/test_d3gzsl_losses.py). Not yet a registered family: the training
step (n critic steps, then a generator step), the teacher pretraining, pooled features, the
final classifier and selection are still to come, so `model=d3gzsl` is not offered.
"""
