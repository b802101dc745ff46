"""The ground floor: tokens and the tensor operations on them that backbones and pruners share.

- :mod:`~prato_exp.tokens.token_set`: the :class:`~prato_exp.tokens.token_set.TokenSet` (tokens, grid
  positions, alive mask, grid size) in its gathered (``drop``) or grid (``mask``) layout, with select,
  to-grid with a fill rule, and the 2 x 2 parent rule to the next stage;
- :mod:`~prato_exp.tokens.blocks`: a transformer block split into its residuals with the attention
  weights exposed (MONAI and timm blocks);
- :mod:`~prato_exp.tokens.windows`: (shifted) window attention on a pruned token set and 2 x 2 merging.

It imports neither :mod:`prato_exp.models` nor :mod:`prato_exp.pruning`; both build on it.
"""
