"""One module per subcommand; each exposes ``command``, registered by :mod:`safelora_cli.cli`."""
