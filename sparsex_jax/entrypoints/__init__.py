"""The applications on top of the library: the `sparsex` command (cli.py), its demo (demo.py) and
the compiled programs it keeps on disk between runs (compile_cache.py). The library
(sparsex_jax/*) never imports from here."""
