from medico_adapters.cli import run

run()
