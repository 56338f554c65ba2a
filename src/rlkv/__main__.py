from rlkv.cli import app

app(prog_name="rlkv")
