"""The data path: moving blocks between sites (NBD, the transfer engine)."""
