"""Serving registered models with the tools of the MLflow and Ray ecosystems.

pyfunc.py is the loader MLflow imports for a version's python_function flavor
(`mlflow.pyfunc.load_model`, `mlflow models serve`); app.py is the Ray Serve application
(`compresszoo serve`, pipelines/serve.py). Both read requests through the same checks as
the CLI, so hostile input is refused the same way everywhere.
"""
