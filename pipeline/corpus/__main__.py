"""`python -m pipeline.corpus` runs the corpus stage with params.yaml from the working directory."""
from pipeline.corpus.stage import main

main()
