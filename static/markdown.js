// Markdown for chat messages: marked (GitHub-flavoured: tables, lists, strikethrough, ...) with KaTeX math
// ($…$, $$…$$, \(…\), \[…\]), then DOMPurify against an allow-list. Safe twice over: raw HTML in the source is shown as
// text (never parsed), links other than http(s)/mailto stay text, images become links (nothing is loaded), and what is
// produced is sanitised to the tags and attributes listed here. The libraries are vendored in static/vendor/.
"use strict";

(function (global) {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const SAFE_URL = /^(?:https?:\/\/|mailto:)/i;

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  function link(href, label) {
    return `<a href="${escapeHtml(href)}" target="_blank" rel="noopener noreferrer">${label}</a>`;
  }

  function tex(source, displayMode) {
    // trust: false keeps \href, \url, \includegraphics and \html* off; errors render as red source text
    return katex.renderToString(source, { displayMode, throwOnError: false, trust: false, strict: "ignore" });
  }

  // Math as marked extensions, so that code spans and blocks keep their dollars. Inline $…$ follows pandoc's rule
  // (no space inside the dollars, no digit right after the closing one), so "$5 and $10" stays text.
  const mathRules = [
    { name: "mathBlock", level: "block", display: true, start: /\n[ \t]*(?:\$\$|\\\[)/,
      re: /^[ \t]{0,3}(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n|$)/ },
    { name: "mathDisplay", level: "inline", display: true, start: /\$\$|\\\[/,
      re: /^(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])/ },
    { name: "mathInline", level: "inline", display: false, start: /\$|\\\(/,
      re: /^(?:\$(?![\s$])((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)|\\\(([\s\S]+?)\\\))/ },
  ];
  const mathExtensions = mathRules.map(({ name, level, display, start, re }) => ({
    name,
    level,
    // where a paragraph or text run must stop to let this rule try (a block only starts after a newline)
    start(src) {
      const match = start.exec(src);
      return match ? match.index + (level === "block" ? 1 : 0) : undefined;
    },
    tokenizer(src) {
      const match = re.exec(src);
      if (match) return { type: name, raw: match[0], text: (match[1] ?? match[2]).trim() };
    },
    renderer: (token) => tex(token.text, display),
  }));

  const renderer = {
    html: ({ text }) => escapeHtml(text), // raw HTML is shown as the text it is
    link({ href, tokens, raw }) {
      return SAFE_URL.test(href) ? link(href, this.parser.parseInline(tokens)) : escapeHtml(raw);
    },
    image: ({ href, text, raw }) => (SAFE_URL.test(href) ? link(href, escapeHtml(text || href)) : escapeHtml(raw)),
    checkbox: ({ checked }) => (checked ? "☑ " : "☐ "),
    code({ text, lang }) {
      const language = (lang || "").replace(/[^\w+#.-]/g, "").slice(0, 20);
      const label = language ? `<span class="code-lang">${language}</span>` : "<span></span>";
      return `<div class="code-block"><div class="code-head">${label}<button type="button" class="copy-code">Copy</button>` +
        `</div><pre><code${language ? ` class="language-${language}"` : ""}>${escapeHtml(text)}</code></pre></div>`;
    },
  };

  const markdown = new marked.Marked({ gfm: true, breaks: true, renderer, extensions: mathExtensions });

  const MATHML_TAGS = ["math", "semantics", "annotation", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msup",
    "msub", "msubsup", "mfrac", "msqrt", "mroot", "mover", "munder", "munderover", "mtable", "mtr", "mtd", "mlabeledtr",
    "mstyle", "mpadded", "mphantom", "menclose", "merror"];
  const PURIFY = {
    ALLOWED_TAGS: ["p", "br", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "code", "pre", "blockquote",
      "ul", "ol", "li", "hr", "a", "table", "thead", "tbody", "tr", "th", "td", "div", "span", "button",
      "svg", "path", "line", ...MATHML_TAGS],
    ALLOWED_ATTR: ["href", "target", "rel", "class", "style", "type", "align", "start", "aria-hidden",
      // KaTeX's SVG (stretchy arrows, roots) and MathML
      "width", "height", "viewbox", "preserveaspectratio", "d", "x1", "x2", "y1", "y2", "stroke-width",
      "xmlns", "display", "encoding", "mathvariant", "mathsize", "stretchy", "fence", "separator", "lspace", "rspace",
      "minsize", "maxsize", "largeop", "accent", "accentunder", "scriptlevel", "displaystyle", "linethickness",
      "columnalign", "columnspacing", "columnlines", "rowspacing", "rowlines", "notation", "depth", "voffset",
      "mathcolor", "mathbackground", "linebreak"],
    // DOMPurify tests every attribute value with this: http(s) and mailto are the only schemes let through
    ALLOWED_URI_REGEXP: /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i,
  };
  // KaTeX's inline styles are sizes and colours; none may fetch anything
  DOMPurify.addHook("uponSanitizeAttribute", (_, data) => {
    if (data.attrName === "style" && /url\s*\(|@import|expression\s*\(/i.test(data.attrValue)) data.keepAttr = false;
  });

  function renderMarkdown(source) {
    return DOMPurify.sanitize(markdown.parse(String(source).replace(/\u0000/g, "")), PURIFY);
  }

  global.renderMarkdown = renderMarkdown;
})(window);
