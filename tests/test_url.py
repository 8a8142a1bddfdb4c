"""fetcher.url.Url: how a FileUrl, a base URL or a proxy URL is parsed, checked and normalised."""

from __future__ import annotations

import pytest

from fetcher.url import InvalidUrl, Url


@pytest.mark.parametrize(
    ("text", "target"),
    [
        pytest.param("http://h", "/", id="empty-path"),
        pytest.param("http://h/a b/c", "/a%20b/c", id="space"),
        pytest.param("http://h/ü?é=ü", "/%C3%BC?%C3%A9=%C3%BC", id="non-ascii"),
        pytest.param("http://h/%2F%zz", "/%2F%zz", id="escapes-kept"),
        pytest.param('http://h/a"<>`{|}^\\', "/a%22%3C%3E%60%7B%7C%7D%5E%5C", id="unsafe-ascii"),
        pytest.param("http://h/p?a=1&b=/:@,;", "/p?a=1&b=/:@,;", id="query-delimiters"),
        pytest.param("http://h/p#frag ment", "/p", id="fragment-dropped"),
    ],
)
def test_url_target_is_normalised(text: str, target: str) -> None:
    """Url.parse percent-encodes what may not go on the wire as it is."""
    assert Url.parse(text).target == target


@pytest.mark.parametrize(
    ("text", "host", "port", "authority"),
    [
        pytest.param("http://Example.COM/", "example.com", 80, "example.com", id="lower-cased"),
        pytest.param(
            "http://example.com:80/", "example.com", 80, "example.com", id="http-80-omitted"
        ),
        pytest.param(
            "https://example.com:443/", "example.com", 443, "example.com", id="https-443-omitted"
        ),
        pytest.param(
            "https://example.com:80/", "example.com", 80, "example.com:80", id="https-80-kept"
        ),
        pytest.param(
            "http://example.com:8080/", "example.com", 8080, "example.com:8080", id="port-kept"
        ),
        pytest.param(
            "http://bücher.example/",
            "xn--bcher-kva.example",
            80,
            "xn--bcher-kva.example",
            id="idna",
        ),
        pytest.param("http://[::1]:8080/", "::1", 8080, "[::1]:8080", id="ipv6-port"),
        pytest.param("https://[::1]/", "::1", 443, "[::1]", id="ipv6-default"),
        pytest.param("http://user:pw@h:81/", "h", 81, "h:81", id="userinfo-not-sent"),
    ],
)
def test_url_host_and_authority(text: str, host: str, port: int, authority: str) -> None:
    """Hosts are normalised (IDNA, IPv6 brackets) and default ports left out of the authority."""
    url = Url.parse(text)
    assert (url.host, url.port, url.authority) == (host, port, authority)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("http://h/a\nb", "URL holds a control character", id="newline"),
        pytest.param("http://h/a\rb", "URL holds a control character", id="carriage-return"),
        pytest.param("http://h/\x00", "URL holds a control character", id="nul"),
        pytest.param("http://h/\x7f", "URL holds a control character", id="del"),
        pytest.param("http://h/a\tb", "URL holds a control character", id="tab"),
        pytest.param(" http://h/", "URL starts or ends with a space", id="leading-space"),
        pytest.param("http://h/ ", "URL starts or ends with a space", id="trailing-space"),
        pytest.param("http://h:99999/", "Port out of range 0-65535", id="port-too-big"),
        pytest.param(
            "http://h:abc/", "Port could not be cast to integer value as 'abc'", id="port-word"
        ),
        pytest.param("http://h:-1/", "Port could not be cast", id="port-negative"),
        pytest.param("http://h:0/", "port 0 is not a port to connect to", id="port-zero"),
        pytest.param("http:///path", "URL has no host", id="no-host"),
        pytest.param("http://:8080/", "URL has no host", id="port-only"),
        pytest.param(
            "http://exa_mple!.com/", "host 'exa_mple!.com' is not a valid name", id="bang"
        ),
        pytest.param("http://a..b/", "host 'a..b' is not a valid name", id="empty-label"),
        pytest.param(
            "http://-a.example/", "host '-a.example' is not a valid name", id="leading-hyphen"
        ),
        pytest.param(
            "http://exa mple.com/", "host 'exa mple.com' is not a valid name", id="space-in-host"
        ),
        pytest.param(
            "http://ex%41mple.com/", "host 'ex%41mple.com' is not a valid name", id="escape-in-host"
        ),
        pytest.param("http://" + "a" * 64 + ".com/", "is not a valid name", id="label-64"),
        pytest.param(
            "http://[::g]/", "does not appear to be an IPv4 or IPv6 address", id="bad-ipv6"
        ),
        pytest.param("ftp://h/", "scheme 'ftp' is not http or https", id="ftp"),
        pytest.param("h/path", "scheme 'none' is not http or https", id="no-scheme"),
    ],
)
def test_unusable_url_is_invalid(text: str, message: str) -> None:
    """Url.parse refuses what cannot be requested, with a message saying why."""
    with pytest.raises(InvalidUrl) as caught:
        Url.parse(text)
    assert message in str(caught.value)
