"""sandboxd.gateway"""
