"""watchbuy.site: the shop (Starlette pages, chat, cart, checkout)."""
