"""Prompts the bundled model (trained on Python sources) answers with confident greedy continuations.

Kept free of any dependency: the GPU check imports them where the server's HTTP packages are missing.
"""

PYTHON_PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main():",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):",
    "if __name__ == '__main__':",
    "try:\n    import json\nexcept ImportError:",
    "def read_file(path):\n    with open(path) as f:",
    "    def __repr__(self):\n        return",
    "raise ValueError(",
    "# Copyright",
    "from collections import",
    "def is_prime(n):\n    if n < 2:\n        return False",
    "    @property\n    def name(self):",
    "while True:\n    line = input()",
    "x = [i * i for i in",
    '"""Utilities for',
]
