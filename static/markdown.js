// A small Markdown renderer for chat messages, safe by construction: the source is HTML-escaped first and only the
// tags below are ever produced, so neither user nor model text can inject markup or script.
// Supports fenced code blocks (also while still open during streaming), inline code, headings, **bold**, *italic* / _italic_,
// strikethrough, http(s)/mailto links, bullet and numbered lists, block quotes, horizontal rules and paragraphs.
"use strict";

(function (global) {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Inline markup on one already-escaped line. Code spans are cut out first so nothing inside them is formatted.
  function inline(escaped) {
    const codes = [];
    let text = escaped.replace(/`([^`]+)`/g, (_, code) => {
      codes.push(`<code>${code}</code>`);
      return `\u0000${codes.length - 1}\u0000`;
    });
    text = text
      .replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (whole, label, url) =>
        /^(https?:\/\/|mailto:)/i.test(url)
          ? `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`
          : whole)
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
      .replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?!\w)/g, "$1<em>$2</em>");
    return text.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
  }

  function codeBlock(lang, lines) {
    const language = (lang || "").replace(/[^\w+#.-]/g, "").slice(0, 20);
    const label = language ? `<span class="code-lang">${language}</span>` : "<span></span>";
    return `<div class="code-block"><div class="code-head">${label}<button type="button" class="copy-code">Copy</button>` +
      `</div><pre><code${language ? ` class="language-${language}"` : ""}>${escapeHtml(lines.join("\n"))}</code></pre></div>`;
  }

  function renderMarkdown(source) {
    const lines = String(source).replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let paragraph = [];
    let list = null; // {tag: "ul"|"ol", items: []}
    let quote = [];

    const flushParagraph = () => {
      if (paragraph.length) out.push(`<p>${paragraph.map((l) => inline(escapeHtml(l))).join("<br>")}</p>`);
      paragraph = [];
    };
    const flushList = () => {
      if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(escapeHtml(i))}</li>`).join("")}</${list.tag}>`);
      list = null;
    };
    const flushQuote = () => {
      if (quote.length) out.push(`<blockquote>${renderMarkdown(quote.join("\n"))}</blockquote>`);
      quote = [];
    };
    const flushAll = () => { flushParagraph(); flushList(); flushQuote(); };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([^`\s]*)\s*$/);
      if (fence) {
        flushAll();
        const code = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) code.push(lines[i]);
        out.push(codeBlock(fence[2], code));
        continue;
      }
      const quoted = line.match(/^\s*>\s?(.*)$/);
      if (quoted) { flushParagraph(); flushList(); quote.push(quoted[1]); continue; }
      flushQuote();
      if (!line.trim()) { flushParagraph(); flushList(); continue; }
      const heading = line.match(/^\s*(#{1,6})\s+(.*)$/);
      if (heading) {
        flushAll();
        const level = heading[1].length;
        out.push(`<h${level}>${inline(escapeHtml(heading[2].replace(/\s*#+\s*$/, "")))}</h${level}>`);
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { flushAll(); out.push("<hr>"); continue; }
      const item = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
      if (item) {
        flushParagraph();
        const tag = /\d/.test(item[1]) ? "ol" : "ul";
        if (list && list.tag !== tag) flushList();
        if (!list) list = { tag, items: [] };
        list.items.push(item[2]);
        continue;
      }
      if (list && /^\s{2,}\S/.test(line)) { list.items[list.items.length - 1] += " " + line.trim(); continue; }
      flushList();
      paragraph.push(line);
    }
    flushAll();
    return out.join("");
  }

  global.escapeHtml = escapeHtml;
  global.renderMarkdown = renderMarkdown;
})(window);
