"""``python -m safelora_cli`` runs the command line."""

from safelora_cli.cli import main

if __name__ == "__main__":
    main()
