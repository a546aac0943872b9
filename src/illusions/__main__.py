from illusions.cli import run

run()
