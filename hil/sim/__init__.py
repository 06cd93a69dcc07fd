"""The simulated CIM chip: device physics, its command interpreter, and its servers."""
