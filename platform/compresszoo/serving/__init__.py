"""Serving registered models with the tools of the MLflow and Ray ecosystems.

pyfunc.py is the loader MLflow imports for a version's python_function flavor
(`mlflow.pyfunc.load_model`, `mlflow models serve`); ray_serve.py is the Ray Serve
application (pipelines/serve.py, cluster/k8s/rayservice.yaml). Both read requests with the
CLI's readers (compresszoo.imagefiles, the codec's container checks) and limits, so hostile
input is refused the same way everywhere.
"""
