"""The README's result tables, one module per kind of result; each function renders one
marked section from experiments/results/ (readme_tables.py writes them into the README)."""
