"""The `rlkv` command line: a thin layer over the Python API.

    rlkv generate --model M --heads heads.json --sparsity 0.5 --prompt "..."
    rlkv serve --model M --heads heads.json --sparsity 0.5 --port 8000
    rlkv heads show heads.json
    rlkv heads list
    rlkv heads convert adapter_weights.tsv heads.json
    rlkv heads plot heads.json -o heads.png --sparsity 0.5
    rlkv identify --model M --task math_train --data-dir DIR --out DIR
    rlkv identify-duo --model M --text FILE --out DIR
    rlkv demo

One module per command group (generate, serve, evaluate, identify, heads, demo), what they share in
`common`. Importing the CLI stays light: each command imports torch and the library when it runs.
Errors the user can fix (bad paths, shapes, values) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import typer

from rlkv.cli import demo, evaluate, generate, heads, identify, serve

app = typer.Typer(help="Per-head KV cache compression for reasoning LLMs (RLKV).", no_args_is_help=True)
heads_app = typer.Typer(help="Show, convert and plot head-score files (JSON or TSV).", no_args_is_help=True)
app.add_typer(heads_app, name="heads")

# in the order `rlkv --help` lists them
app.command("generate")(generate.generate)
app.command("serve")(serve.serve)
app.command("eval")(evaluate.evaluate)
app.command("identify")(identify.identify)
app.command("identify-duo")(identify.identify_duo)
app.command("demo")(demo.demo)
app.command("report")(evaluate.report)
app.command("tasks")(evaluate.tasks)

heads_app.command("list")(heads.heads_list)
heads_app.command("show")(heads.heads_show)
heads_app.command("convert")(heads.heads_convert)
heads_app.command("plot")(heads.heads_plot)

__all__ = ["app", "heads_app"]
