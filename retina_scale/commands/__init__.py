"""Subcommands of the ``retina-scale`` console entry point (see ``retina_scale.cli``)."""
