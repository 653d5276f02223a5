"""The control channel: every live training process serves a Unix socket that clients (the CLI's
`pause`/`save`/`status`, later the app) use to watch and steer it. torch-free, never imports textual.

- protocol: the wire format (newline-delimited JSON), where a run's socket lives, peer checks
- server:   ControlServer, run by the training process on its own thread
- connection: one client of the server: its socket and bounded, coalescing queue
- dispatch: the run's status and each request's reply (socket-free)
- client:   ControlClient, a small blocking client
- commands: the CLI commands built on them (pause, save, status, --detach)
"""
