"""Plain classes MainScreen owns, one per concern, so no screen class holds the app's whole behaviour:
browsing the store (browse.py), the live run's numbers and events (live.py), starting / attaching / pausing
/ quitting a run (training.py), and the keys that act on the selected checkpoint (tools.py).

Each gets the screen at construction and reaches widgets through it; widgets own their state and post
messages, and MainScreen's `on_<widget>_<message>` handlers hand each message to the controller it is for.
See ARCHITECTURE.md ("The app")."""
