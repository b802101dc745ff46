"""The ground floor: tokens and the tensor operations on them that backbones and pruners share.

- :mod:`~prato_exp.tokens.token_set`: the alive token set (tokens, grid positions, valid mask) with
  gather, scatter and writes to the grid;
- :mod:`~prato_exp.tokens.blocks`: a transformer block split into its residuals with the attention
  weights exposed (MONAI and timm blocks);
- :mod:`~prato_exp.tokens.windows`: (shifted) window attention on a pruned token set and 2 x 2 merging.

It imports neither :mod:`prato_exp.models` nor :mod:`prato_exp.pruning`; both build on it.
"""
