from distrain.cli import entry

entry()
