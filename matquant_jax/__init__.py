"""matquant_jax."""
