// A credential the admin page creates never travels on the page's event stream: the message carries a one-time
// link, and this fetches it with the admin's own cookie and shows the credential in place of the link.
(() => {
  const reveal = (link) => {
    link.dataset.revealing = "1";
    fetch(link.getAttribute("href"), { credentials: "same-origin", cache: "no-store" })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((secret) => {
        const code = document.createElement("code");
        code.textContent = secret;
        link.replaceWith(code);
      })
      .catch(() => { link.textContent = "(already shown or expired)"; link.removeAttribute("href"); });
  };
  new MutationObserver(() => {
    document.querySelectorAll('a[href*="/rlhf/secret/"]:not([data-revealing])').forEach(reveal);
  }).observe(document.documentElement, { childList: true, subtree: true });
})();
