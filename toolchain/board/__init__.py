"""Files copied as they are into the bundle a Linux board runs; edgecc imports only preprocess.py (the one
implementation of the preprocessing) and the audit log writer, so the board and edgecc cannot drift apart."""
