// The Conveyor dashboard's page: reads /api/overview every refresh and
// draws it. Everything from the broker (names, errors, payloads) goes into
// the page as text nodes (`el` below), never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];
let intervalMs = 2000;
let timer = null;

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

const num = (n) => (n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"));

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function ago(ms) {
  if (ms === null || ms === undefined) return "-";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function time(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "-";
}

function figure(n, label, cls) {
  return el("div", { class: "figure" }, el("div", { class: "n " + (cls || "") }, n), el("div", { class: "l" }, label));
}

// The lag chart: the total (thick) and up to 8 partitions, over the kept history.
function chart(history) {
  const w = 600, h = 140, left = 44, bottom = 18, top = 8;
  const box = svg("svg", { class: "chart", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" });
  const t = history.t || [];
  const series = (history.series || []).slice()
    .sort((a, b) => Math.max(...b.lag.map((x) => x || 0)) - Math.max(...a.lag.map((x) => x || 0)))
    .slice(0, COLORS.length);
  const totalSwatch = el("i");
  totalSwatch.style.background = "#1d2330";
  const legend = el("div", { class: "legend" }, el("span", {}, totalSwatch, "total"));
  if (t.length < 2) {
    const text = svg("text", { x: left, y: h / 2 });
    text.textContent = "collecting lag history…";
    box.append(text);
    return el("div", { class: "chart-box" }, box);
  }
  const t0 = t[0], t1 = t[t.length - 1], span = Math.max(1, t1 - t0);
  const max = Math.max(1, ...(history.total || []));
  const x = (ts) => left + ((ts - t0) / span) * (w - left - 4);
  const y = (v) => top + (1 - v / max) * (h - top - bottom);
  for (const v of [0, max / 2, max]) {
    box.append(svg("line", { class: "grid", x1: left, x2: w, y1: y(v), y2: y(v) }));
    const label = svg("text", { x: left - 4, y: y(v) + 3, "text-anchor": "end" });
    label.textContent = num(Math.round(v));
    box.append(label);
  }
  const minutes = Math.round(span / 60000);
  const from = svg("text", { x: left, y: h - 4 });
  from.textContent = minutes >= 1 ? `-${minutes} min` : `-${Math.round(span / 1000)} s`;
  const to = svg("text", { x: w - 4, y: h - 4, "text-anchor": "end" });
  to.textContent = "now";
  box.append(from, to);
  const line = (values, cls, color, label) => {
    const points = [];
    values.forEach((v, i) => { if (v !== null && v !== undefined) points.push(`${x(t[i]).toFixed(1)},${y(v).toFixed(1)}`); });
    const p = svg("polyline", { class: cls, points: points.join(" ") });
    if (color) p.setAttribute("stroke", color);
    const title = svg("title");
    title.textContent = `${label}: lag ${num(values[values.length - 1])} now, at most ${num(Math.max(...values.map((v) => v || 0)))}`;
    p.append(title);
    box.append(p);
  };
  series.forEach((s, i) => {
    line(s.lag, "series", COLORS[i], `${s.topic}/${s.partition}`);
    const sw = el("i");
    sw.style.background = COLORS[i];
    legend.append(el("span", {}, sw, `${s.topic}/${s.partition}`));
  });
  line(history.total, "total", null, "total");
  return el("div", { class: "chart-box" }, box, legend);
}

function groupCard(g, dlqs) {
  const behind = g.total_lag > 0;
  const queue = g.mode === "queue";
  const rows = g.partitions.map((p) => el("tr", {},
    el("td", {}, p.topic), el("td", { class: "num" }, p.partition),
    el("td", { class: "num" }, num(p.committed)), el("td", { class: "num" }, num(p.log_end)),
    el("td", { class: "num lag" }, num(p.lag)),
    queue ? el("td", { class: "num" }, num(p.in_flight)) : null,
    queue ? el("td", { class: "num" }, num(p.available)) : null));
  const head = el("tr", {}, el("th", {}, "topic"), el("th", { class: "num" }, "partition"),
    el("th", { class: "num" }, queue ? "lowest unsettled" : "committed"), el("th", { class: "num" }, "log end"),
    el("th", { class: "num" }, "lag"), queue ? el("th", { class: "num" }, "in flight") : null,
    queue ? el("th", { class: "num" }, "available") : null);
  let members;
  if (!g.members_visible) {
    members = el("div", { class: "muted" }, "members: not visible here (an embedded store keeps them in the owning process)");
  } else if (g.members.length === 0) {
    members = el("div", { class: "muted" }, "members: none");
  } else {
    members = el("div", {}, `members: ${g.members.length}`, el("ul", { class: "members" }, g.members.map((m) => el("li", { class: "mono" },
      `${m.id} reads ${m.topics.join(", ")}; `,
      queue ? `${num(m.leases)} leased` : `owns ${m.assignment.map((a) => a[0] + "/" + a[1]).join(", ") || "nothing"}`,
      `; seen ${num(m.idle_ms)} ms ago`))));
  }
  const dlqLinks = (g.dlq_topics || []).map((t) => {
    const d = dlqs.find((x) => x.topic === t);
    return el("a", { href: "#dlq-" + t }, `${t} (${num(d ? d.waiting : 0)} waiting)`);
  });
  return el("div", { class: "card group", "data-group": g.group },
    el("div", { class: "card-head" }, el("h3", {}, g.group), el("span", { class: "badge " + g.mode }, g.mode),
      el("span", { class: "badge " + (behind ? "behind" : "caught-up") }, behind ? "behind" : "caught up")),
    el("div", { class: "figures" },
      figure(num(g.total_lag), "lag", "total-lag"),
      queue ? figure(num(g.total_in_flight), "in flight") : null,
      !queue && g.members_visible ? figure(num(g.generation), "generation") : null,
      figure(num(g.partitions.length), "partitions"),
      g.max_deliveries ? figure(num(g.max_deliveries), "deliveries before DLQ") : null),
    chart(g.history || {}),
    members,
    dlqLinks.length ? el("div", {}, "DLQ: ", dlqLinks) : null,
    el("table", {}, el("thead", {}, head), el("tbody", {}, rows)));
}

function dlqSection(d, allowRedrive) {
  const rows = d.messages.map((m) => el("tr", { class: "dead-letter" },
    el("td", { class: "mono" }, `${m.partition}@${m.offset}`),
    el("td", { class: "mono" }, m.origin || "not a dead letter"),
    el("td", {}, m.group || "-"),
    el("td", { class: "num" }, m.attempts === null ? "-" : num(m.attempts)),
    el("td", { class: "error-text" }, m.error || (m.origin ? "(no reason given)" : "-")),
    el("td", { class: "muted" }, m.failed_at ? ago(m.failed_at) : "-"),
    el("td", { class: "mono value" }, m.key ? el("span", { class: "muted" }, "key " + m.key + "  ") : null,
      m.value, m.value_truncated ? ` … (${num(m.value_bytes)} bytes)` : "")));
  let button = null;
  if (allowRedrive) {
    button = el("button", { class: "redrive", type: "button", disabled: d.waiting === 0 ? "disabled" : null },
      d.waiting === 0 ? "Nothing to redrive" : `Redrive ${num(d.waiting)}`);
    button.addEventListener("click", () => redrive(d.topic, button));
  }
  const more = d.waiting > d.messages.length
    ? el("div", { class: "muted" }, `showing the first ${num(d.messages.length)} of ${num(d.waiting)} waiting`) : null;
  return el("div", { class: "card dlq", id: "dlq-" + d.topic, "data-dlq": d.topic },
    el("div", { class: "card-head" }, el("h3", {}, d.topic),
      d.groups.length ? el("span", { class: "muted" }, "from group " + d.groups.join(", ")) : null,
      el("span", { class: "badge " + (d.waiting > 0 ? "behind" : "caught-up") },
        el("span", { class: "waiting" }, num(d.waiting)), " waiting"),
      el("span", { class: "muted" }, `${num(d.total)} records kept`),
      el("span", { class: "right" }, button)),
    d.error ? el("div", { class: "error-text" }, d.error) : null,
    d.messages.length ? el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "dlq offset"), el("th", {}, "origin"), el("th", {}, "group"),
        el("th", { class: "num" }, "attempts"), el("th", {}, "error"), el("th", {}, "failed"), el("th", {}, "value"))),
      el("tbody", {}, rows)) : el("div", { class: "muted" }, "no dead letters waiting"),
    more);
}

function topicsTable(topics) {
  const rows = [];
  for (const t of topics) {
    rows.push(el("tr", { class: "topic", "data-topic": t.topic },
      el("td", {}, el("b", {}, t.topic), t.is_dlq ? el("span", { class: "badge" }, " DLQ") : null),
      el("td", { class: "num" }, num(t.partitions.length)), el("td", { class: "num" }, num(t.records)),
      el("td", { class: "num" }, bytes(t.bytes)), el("td", {}, "")));
    for (const p of t.partitions) {
      rows.push(el("tr", { class: "muted" }, el("td", {}, `  partition ${p.partition}`), el("td", {}, ""),
        el("td", { class: "num" }, num(p.log_end - p.log_start)), el("td", { class: "num" }, bytes(p.bytes)),
        el("td", { class: "mono" }, `log start ${num(p.log_start)} · log end ${num(p.log_end)}`)));
    }
  }
  return el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "topic"), el("th", { class: "num" }, "partitions"),
    el("th", { class: "num" }, "records"), el("th", { class: "num" }, "bytes"), el("th", {}, "offsets"))),
  el("tbody", {}, rows));
}

function render(o) {
  document.getElementById("broker").textContent = `${o.backend} · ${o.url}`;
  const access = document.getElementById("access");
  access.textContent = o.allow_redrive ? "redrive allowed" : "read-only";
  document.getElementById("refreshed").textContent = o.refreshed_at ? "refreshed " + time(o.refreshed_at) : "not read yet";
  const problem = document.getElementById("problem");
  problem.hidden = !o.error;
  problem.textContent = o.error ? "The last refresh failed: " + o.error : "";
  const groups = document.getElementById("groups");
  groups.replaceChildren(...(o.groups.length ? o.groups.map((g) => groupCard(g, o.dlqs)) : [el("div", { class: "muted" }, "no groups")]));
  const dlqs = document.getElementById("dlqs");
  dlqs.replaceChildren(...(o.dlqs.length ? o.dlqs.map((d) => dlqSection(d, o.allow_redrive)) : [el("div", { class: "muted" }, "no DLQ topics")]));
  document.getElementById("topics").replaceChildren(o.topics.length ? topicsTable(o.topics) : el("div", { class: "muted" }, "no topics"));
  const behind = o.groups.filter((g) => g.total_lag > 0).length;
  const waiting = o.dlqs.reduce((n, d) => n + d.waiting, 0);
  document.title = `Conveyor · ${behind} behind · ${num(waiting)} dead letters`;
  document.body.setAttribute("data-loaded", "true");
}

function say(text, isError) {
  const status = document.getElementById("status");
  status.hidden = false;
  status.className = "banner" + (isError ? " error" : "");
  status.textContent = text;
}

async function redrive(topic, button) {
  button.disabled = true;
  try {
    const response = await fetch("/api/redrive", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ dlq_topic: topic }),
    });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      say(`Redrove ${num(body.redriven)} dead letter${body.redriven === 1 ? "" : "s"} from ${topic}.`, false);
    } else {
      say(`Redrive of ${topic} failed (${response.status}): ${body.error || response.statusText}`, true);
    }
  } catch (e) {
    say(`Redrive of ${topic} failed: ${e}`, true);
  }
  await refresh();
}

async function refresh() {
  clearTimeout(timer);
  try {
    const response = await fetch("/api/overview", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const o = await response.json();
    intervalMs = o.interval_ms || intervalMs;
    render(o);
  } catch (e) {
    const problem = document.getElementById("problem");
    problem.hidden = false;
    problem.textContent = `The dashboard cannot be reached: ${e}`;
  }
  timer = setTimeout(refresh, Math.max(500, intervalMs));
}

refresh();
