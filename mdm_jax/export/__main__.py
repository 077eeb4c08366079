from mdm_jax.export.cli import cli

cli()
