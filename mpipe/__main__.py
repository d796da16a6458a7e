from mpipe.cli import entry

entry()
