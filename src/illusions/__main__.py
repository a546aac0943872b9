from illusions.cli import app

app(prog_name="illusions")
