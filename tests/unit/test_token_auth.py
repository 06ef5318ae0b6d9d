"""router/auth.py TokenAuth: which tenant an Authorization value names."""
from pdcluster.router.auth import TokenAuth

TOKEN = "s3cret-token-0123456789"


def test_the_bearer_scheme_is_matched_in_any_case_and_nothing_else_passes():
    auth = TokenAuth({TOKEN: "acme"})
    for ok in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer   {TOKEN} ", f" Bearer {TOKEN}"):
        assert auth.tenant(ok) == "acme", ok
    for bad in (None, "", "Bearer", f"Basic {TOKEN}", f"Bearer{TOKEN}", f"Bearer {TOKEN}x", TOKEN, "Bearer "):
        assert auth.tenant(bad) is None, bad
