from plugins_sdk import Plugin

plugin = Plugin()


@plugin.tool
def greet(name: str) -> str:
    """Says hello to someone."""
    return f"Hello, {name}!"
