"""The torch-free, textual-free core: config, the run store, plans, events, formats. Anyone may import it."""
