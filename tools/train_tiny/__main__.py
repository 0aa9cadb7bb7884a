"""``python -m tools.train_tiny``: train the bundled tiny JetMoe (see ``tools.train_tiny.train``)."""

from tools.train_tiny.train import main

main()
