"""hetscale_jax: DeiT that grows skip-connected units where splitting eigenvalues are negative.

Public API: `hetscale_jax.grow` (splitting_spectrum, select, grow, migrate_opt_state),
`hetscale_jax.layers.GrowableDense`, `hetscale_jax.models.deit`.
"""
