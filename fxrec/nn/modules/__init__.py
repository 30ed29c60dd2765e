"""fxrec.nn.modules: ``hashtable`` (dynamic tables) and ``embedding`` (options and engine)."""
