"""The Discord front ends: the gateway bot (`gateway`) and the HTTP interactions endpoint
(`http`), over one delivery layer (`delivery`, `render`) and one command tree (`tree`)."""
