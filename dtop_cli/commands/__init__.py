"""One module per command that does more than parse and print: the work behind the CLI.

Each returns plain data (dicts, dataclasses); ``cli.py`` parses the arguments and
``render.py`` draws the tables.
"""
