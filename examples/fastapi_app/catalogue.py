"""The seeded catalogue: deterministic product names and prices (no database here)."""

from __future__ import annotations

PRODUCTS = 5000
PER_PAGE = 50


def product_name(product_id: int) -> str:
    """The seeded name of a product."""
    colours = ("red", "green", "blue", "black", "white", "silver", "orange")
    things = ("kettle", "lamp", "chair", "backpack", "umbrella", "notebook", "mug", "clock")
    colour = colours[product_id % len(colours)]
    thing = things[product_id * 7 % len(things)]
    return f"{colour.title()} {thing} no. {product_id}"


def product_price(product_id: int) -> str:
    """The seeded price of a product, as a string with two decimals."""
    return f"{(product_id * 37) % 20000 / 100 + 1:.2f}"
